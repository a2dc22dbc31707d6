"""Collectives of a worker group: its tensor all-reduce and object gathers on the right device."""

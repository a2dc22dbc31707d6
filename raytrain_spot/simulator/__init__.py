"""The Spot simulator of the embedded cluster and the GCE metadata emulator it drives."""

"""Hugging Face vision-language models as a training task (``+experiment=hf_vlm``; ``pip install .[hf]``)."""

"""Adapters: the file format (a leaf), save / load / merge, the HF PEFT export, the model card and the Hub."""

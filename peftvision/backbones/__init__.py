"""Backbones: create and load timm models, describe their structure (`backbone.py`), and the small
pretrained models that ship with peftvision (`weights.py` names them, `embedded.py` registers them with timm)."""

"""Fake (meta) implementations of the torch.ops.flashmla ops. Installed as ``flashmla_ops.meta``."""

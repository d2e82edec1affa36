"""Framework integrations of flashmla_ops (SGLang). Installed as ``flashmla_ops.integration``."""

"""clipforge.pretrain: dual-encoder contrastive pretraining, checkpoints, and model loading."""

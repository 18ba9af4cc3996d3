"""Training wrappers around vitkit models, as vit-pytorch's (`vitkit.trainers.<module>.<Class>`).
Each is a `keras.Model` that overrides `call` and `compute_loss` only, so `compile` and `fit`
work on every backend."""

"""Training: losses, augmentation, Ray Train loops, cross-validation and Tune."""

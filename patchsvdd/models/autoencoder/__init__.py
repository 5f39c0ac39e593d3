"""The convolutional autoencoder baseline: network and maps, training."""

"""Models: dilated ResNet backbones, DeepLab heads and decoders, built from a variant."""

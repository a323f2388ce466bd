"""The PyTorch model: the U-Net, its diffusion math and the loop ops on torch tensors."""

"""Host side of every op: input checks, dispatch by impl/device, torch.library registration."""

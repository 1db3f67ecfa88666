"""The coordinator's side: the round loop, who is who, the grid, the strategies."""

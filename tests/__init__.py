"""The test suite of mecha10-modeld: unit/ (pure, no ML stack, seconds), integration/ and faults/ (real parts), support/ (helpers)."""

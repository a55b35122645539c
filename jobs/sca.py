"""Job family sca (see DESIGN.md)."""

"""Job family pisp (see DESIGN.md)."""

"""Job family aisp (see DESIGN.md)."""

"""Job family kyc (see DESIGN.md)."""

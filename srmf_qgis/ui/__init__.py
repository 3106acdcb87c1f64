"""Dialogs and widgets of the SRMF plugin (Qt; no torch)."""

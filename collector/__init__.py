"""flowscope component."""

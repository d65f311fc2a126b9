"""emoprompt subpackage."""

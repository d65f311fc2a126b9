"""emoprompt: prompting small instruct LLMs to classify the emotion of Spanish tweets."""

__version__ = "0.1.0"

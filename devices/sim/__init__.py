"""In-process machine models: the virtual backend every test and the demo use."""

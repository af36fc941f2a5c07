"""The ``moefl`` command line, on top of every other package."""

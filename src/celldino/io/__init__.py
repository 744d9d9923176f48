"""Readers and writers of every file format the stages exchange, one module per format, and the
names of those files (`runlayout`); docs/architecture.md ("Files") lists what stays outside."""

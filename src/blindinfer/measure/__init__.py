"""Launch measurements of a confidential VM, computed from its boot files.

A client pins these values in its policy; computing them from the files a user can rebuild
is what lets the user trust the pin without trusting whoever ran the VM.
"""

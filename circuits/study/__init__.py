"""The study: its configuration, the stage store, the declared stages and their runner, the command
line.
"""

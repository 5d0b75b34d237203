"""Reporting: one function per figure, the HTML/Markdown page writer, the study report."""

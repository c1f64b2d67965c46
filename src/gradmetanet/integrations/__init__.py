"""One module per third-party library whose module types capture describes; each is imported by the capture
registry the first time it meets a module of that library (so importing gradmetanet never imports them)."""

class JaxeditError(Exception):
    """Bad input or missing resource; the message is one line saying what was wrong and what to do."""

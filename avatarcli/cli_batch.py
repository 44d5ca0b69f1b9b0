def register(app):
    return None

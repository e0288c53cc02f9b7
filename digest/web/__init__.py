"""The web app: subscribe, confirm, manage preferences, unsubscribe (``create_app`` in ``app``)."""

"""The hostile app's ServerApp (never run: the test plays it with FlowerEngine.take)."""

from flwr.serverapp import ServerApp

app = ServerApp()

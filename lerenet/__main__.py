from lerenet.cli import app

app()

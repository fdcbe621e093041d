"""One module per command group; each registers its commands on :data:`lerenet.app.app`."""

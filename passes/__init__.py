"""FX passes over the Dynamo graph of a DiT forward."""

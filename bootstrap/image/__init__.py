"""Images: references, registry client, the shared store, the layer cache, composition (see api)."""

"""Images: references, registry client, manifests, the shared store, unpacking."""

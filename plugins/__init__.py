"""Request/response plugins, registered under the `bascule.plugins` entry-point group."""

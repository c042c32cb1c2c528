"""The admin listener's dashboard: one page from package data (static/), the JSON
document it polls (state.py), and the headers that keep it safe to expose on an
internal network (assets.py)."""

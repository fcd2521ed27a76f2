"""quantlens dashboard: a Streamlit front end over `analysis` (run it with `quantlens dashboard`).

Nothing is imported here: `dashboard.launch` must stay cheap to import from the CLI.
"""

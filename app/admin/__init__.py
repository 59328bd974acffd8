"""/admin: warm and purge (app/admin/views.py)."""

"""Reports: figures (matplotlib, Agg backend), tables and HTML/Markdown built from results."""

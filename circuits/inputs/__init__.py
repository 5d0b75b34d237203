"""What goes in: decision contexts (data in circuits/data/contexts.toml), names, prompt sets and pairs,
imported tables.
"""

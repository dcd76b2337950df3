"""Writing a dpipes plugin: a Python class that processes Arrow tables, the shape of Alteryx's ``PluginV2``.

(Placeholder: the guide is written below once the modules settle.)
"""

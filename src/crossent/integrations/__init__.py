"""Recipes for libraries whose training loops crossent plugs into (nothing imported here
imports those libraries: they are used through the objects you pass)."""

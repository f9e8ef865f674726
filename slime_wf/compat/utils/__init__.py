"""`slime.utils`: the helpers slime's plugins import."""

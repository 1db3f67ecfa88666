"""What travels: update codecs, screening of incoming updates, Flower records."""

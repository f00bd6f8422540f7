"""Money: the hardware catalog, the cost-recovering price split, price rows, the seed's format."""

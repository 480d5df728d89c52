"""The site: Flower ClientApp, DP-SGD training, the site ledger, the secure-aggregation client."""

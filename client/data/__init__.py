"""A site's data: the site YAML and its privacy section, the case list and clinical
table, the MONAI dataset with its persistent split, the store of preprocessed
volumes and the public datasets for pretraining."""

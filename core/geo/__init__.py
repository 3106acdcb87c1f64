"""GDAL/OGR access shared by every command: reading rasters (bands, scaling, nodata), writing class
GeoTIFFs, opening vector layers and fields, CRS handling. No torch here."""

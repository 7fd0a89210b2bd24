{
  "targets": [
    {
      "target_name": "mapped_loop",
      "sources": ["mapped_loop.c"],
      "defines": ["NAPI_VERSION=8"],
      "cflags": ["-std=gnu11", "-O2", "-Wall", "-Wextra"]
    }
  ]
}

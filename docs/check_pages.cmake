# After Doxygen: the front page, each chapter's page and the papers' and measurements' pages must exist.
#   cmake -DHTML_DIR=build/docs/html "-DPAGES=index.html;md_naive_README.html;..." -P docs/check_pages.cmake
set(missing "")
foreach(page IN LISTS PAGES)
  if(NOT EXISTS ${HTML_DIR}/${page})
    list(APPEND missing ${page})
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "docs: pages missing from ${HTML_DIR}: ${missing}")
endif()
list(LENGTH PAGES count)
message(STATUS "docs: all ${count} pages present in ${HTML_DIR}")
